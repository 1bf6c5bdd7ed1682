"""The subjects, task phrasings and argument pools that prompts and built responses draw from.

TOPICS and TASKS are keyed by split: the eval split holds out task topics and task phrasings, so
an eval prompt never asks about a seen subject in seen words.
"""

from __future__ import annotations

import dataclasses

SPLITS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class Topic:
  name: str  # as a task names it: "the moon"
  keyword: str  # a word that the name and most facts hold, for keywords:frequency
  facts: tuple[str, ...]  # short plain sentences: no quotes, brackets, asterisks or ALL-CAPS words


def _topic(name: str, *facts: str, keyword: str = "") -> Topic:
  return Topic(name, keyword or name, facts)


# Train and eval topics are disjoint, so an eval prompt never asks about a seen subject.
TOPICS = {
    "train": (
        _topic("bees", "Bees make honey from the nectar of flowers.",
               "Bees live together in large groups called colonies.",
               "A colony has one queen, many workers and some drones.",
               "Bees carry pollen, which helps plants grow fruit.",
               "Bees talk to each other by dancing.", "Without bees, many crops would fail."),
        _topic("bread", "Bread is made from flour, water and yeast.",
               "Yeast makes bread rise by producing gas.", "Fresh bread smells warm and sweet.",
               "People have baked bread for thousands of years.",
               "A loaf needs time in a hot oven.", "Stale bread can become crumbs or toast."),
        _topic("rain", "Rain falls when clouds grow too heavy.",
               "Rain fills rivers, lakes and wells.", "Plants need rain to grow.",
               "Heavy rain can cause floods.", "A rainbow may appear after the rain.",
               "Some deserts get almost no rain each year."),
        _topic("bicycles", "Bicycles have two wheels, pedals and a chain.",
               "Riding bicycles is good exercise.", "Bicycles do not burn any fuel.",
               "A helmet keeps riders safe.", "Many cities build special lanes for bicycles.",
               "Old bicycles can be fixed with simple tools."),
        _topic("the moon", "The moon circles the Earth about once a month.",
               "The moon has no air or water.", "Its pull creates the ocean tides.",
               "The moon shines by reflecting sunlight.",
               "People first walked on the moon in 1969.",
               "We always see the same side of the moon.", keyword="moon"),
        _topic("coffee", "Coffee is made from roasted beans.",
               "Coffee contains caffeine, which keeps people awake.",
               "Many people drink coffee in the morning.", "Coffee plants grow best in warm hills.",
               "Too much coffee can make sleep hard.", "Milk and sugar soften the bitter taste."),
        _topic("trees", "Trees make oxygen from sunlight, air and water.",
               "Trees give shade on hot days.", "The rings in a trunk show its age.",
               "Birds build nests in trees.", "Some trees live for thousands of years.",
               "Roots hold the soil in place."),
        _topic("libraries", "Libraries lend books for free.",
               "Libraries offer quiet places to study.",
               "Many libraries also lend films and music.",
               "Librarians help people find information.",
               "Books are sorted by subject, author and title.",
               "Some libraries host reading groups for children."),
        _topic("volcanoes", "Volcanoes form where hot rock rises from deep underground.",
               "Melted rock is called lava above ground.",
               "Some volcanoes are quiet for centuries.", "Ash from volcanoes can block the sun.",
               "Volcanic soil is rich, dark and fertile.",
               "Islands like Hawaii were built by volcanoes."),
        _topic("dogs", "Dogs have lived with people for thousands of years.",
               "Dogs can smell far better than humans.",
               "Many dogs enjoy long walks, games and treats.", "Some dogs guide blind people.",
               "A puppy needs patience and training.", "Dogs show joy by wagging their tails."),
        _topic("the ocean", "The ocean covers most of the Earth.",
               "The ocean holds salt water, whales and coral.",
               "Waves are pushed along by the wind.", "The deep ocean is cold and dark.",
               "The ocean makes much of the oxygen we breathe.",
               "Plastic waste harms life in the ocean.", keyword="ocean"),
        _topic("chess", "Chess is played on a board of 64 squares.",
               "Each player starts with sixteen pieces.", "The goal of chess is to trap the king.",
               "Chess rewards patience, planning and memory.",
               "A chess game can last minutes or hours.",
               "Computers now play chess better than people."),
        _topic("gardens", "Gardens need sun, water and good soil.",
               "Gardens can grow flowers, herbs or vegetables.", "Weeding keeps plants healthy.",
               "Worms help gardens by loosening the soil.",
               "Many people find calm in their gardens.",
               "Compost feeds the soil with old food scraps."),
        _topic("trains", "Trains run on steel rails.",
               "Trains can carry hundreds of passengers at once.",
               "Freight trains move coal, grain and cars.",
               "Fast trains can travel over 300 kilometres an hour.",
               "A station is where trains stop.", "Trains use less fuel per person than cars."),
        _topic("snow", "Snow forms when water freezes in cold clouds.",
               "Every snow crystal has six sides.", "Fresh snow is soft, white and quiet.",
               "Children build snowmen and ride sleds.", "Deep snow can close roads and schools.",
               "Melting snow feeds rivers in spring."),
        _topic("apples", "Apples grow on trees in cool places.",
               "Apples can be red, green or yellow.", "Apples are picked in the autumn.",
               "An apple a day is a healthy snack.", "Apples are used in pies and juice.",
               "Some apples taste sweet and others sour."),
    ),
    "eval": (
        _topic("owls", "Owls hunt mostly at night.", "Owls can turn their heads very far.",
               "Soft feathers let owls fly silently.", "Owls eat mice, insects and small birds.",
               "Their large eyes see well in the dark.", "Many owls nest in hollow trees."),
        _topic("bridges", "Bridges let people cross rivers and valleys.",
               "Bridges can be built from stone, wood or steel.",
               "Some bridges hang from strong cables.", "Engineers test bridges for heavy loads.",
               "Old stone bridges can last for centuries.",
               "A drawbridge lifts to let boats pass."),
        _topic("tea", "Tea is made from the leaves of a shrub.",
               "Tea can be green, black or white.",
               "Many people drink tea with milk.", "Tea has less caffeine than coffee.",
               "Hot water brings out the flavour of tea.",
               "Some cultures hold special tea ceremonies."),
        _topic("deserts", "Deserts get very little rain.",
               "Deserts can be hot by day and cold at night.",
               "Cactus plants store water in thick stems.",
               "Camels can cross deserts for days without drinking.",
               "Some deserts are covered in sand, others in rock.",
               "Deserts cover about a fifth of the land."),
        _topic("kites", "Kites fly when wind pushes against them.",
               "Kites are made of paper, cloth or plastic.", "A long tail keeps kites steady.",
               "People fly kites at beaches and parks.",
               "Kites were first made long ago in China.",
               "A strong string stops the kite from escaping."),
        _topic("clocks", "Clocks measure hours, minutes and seconds.",
               "Old clocks used springs and gears.", "Some clocks chime every hour.",
               "Digital clocks show the time as numbers.", "Clocks help people arrive on time.",
               "A sundial tells time with a shadow."),
        _topic("mountains", "Mountains rise high above the land around them.",
               "The air on mountains is thin and cold.",
               "Snow often covers the tops of mountains.", "Many rivers start in the mountains.",
               "Climbing mountains takes strength and care.",
               "Goats and eagles live on steep slopes."),
        _topic("music", "Music can make people happy, calm or sad.",
               "Music is made of rhythm and melody.", "Every culture has its own music.",
               "Learning music trains the memory.",
               "Drums, pianos and flutes make different sounds.", "People often dance to music."),
    ),
}

# The task half of an instruction; the constraints follow it.
TASKS = {
    "train": (
        "Write a short note about {topic}.",
        "Tell me a few facts about {topic}.",
        "Describe {topic} in simple words.",
        "What do you know about {topic}?",
        "Write a short text for a school newsletter about {topic}.",
    ),
    "eval": (
        "Give a brief overview of {topic}.",
        "Explain {topic} to a curious child.",
        "Share some interesting points about {topic}.",
    ),
}

# Argument pools. None holds a comma, so punct:no_commas never changes a phrase another
# constraint asks for verbatim.
START_PHRASES = ("Here is what I know.", "Sure thing.", "Good question.", "Let me explain.",
                 "Happy to help.")
END_PHRASES = ("Is there anything else I can help with?", "That is all.", "Thanks for reading.",
               "Hope this helps.", "Let me know if you have questions.")
PS_NOTES = ("Thanks for reading.", "Ask me if you want to know more.",
            "There is much more to learn.", "Write back with any questions.")
TITLES = ("All About {name}", "A Few Facts on {name}", "Notes on {name}", "{name} in Brief")
# by the number of [placeholders] they hold
PLACEHOLDER_LINES = {
    1: ("Please share this with [name].", "Written by [author]."),
    2: ("Written by [author] on [date].", "Send questions to [name] at [email]."),
    3: ("Written by [author] in [city] on [date].",
        "Send questions to [name] at [email] before [date]."),
}
JSON_KEYS = ("topic", "summary", "fact", "detail", "note")
# keywords:exclude draws from these as well as from the topic's unused facts
AVOID_WORDS = ("very", "really", "thing", "stuff", "nice", "great", "amazing", "basically")
# words too common to ask for or forbid
_STOP = frozenset((
    "about", "above", "after", "also", "always", "become", "before", "best", "called", "could",
    "does", "each", "every", "from", "have", "help", "helps", "into", "keep", "keeps", "less",
    "like", "long", "made", "make", "makes", "many", "more", "most", "much", "once", "other",
    "others", "over", "same", "should", "some", "than", "that", "their", "them", "there",
    "these", "they", "this", "those", "used", "very", "what", "when", "where", "which", "will",
    "with", "without", "would"))
